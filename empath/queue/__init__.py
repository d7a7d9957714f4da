"""The queue: scheduling of delivery attempts over the spool (the spool *is* the queue)."""

from empath.queue.manager import QueueManager, QueueStats, Recovered, recovered

__all__ = ["QueueManager", "QueueStats", "Recovered", "recovered"]
