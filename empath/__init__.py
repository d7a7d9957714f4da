"""empath — an ops-first mail transfer agent.

Data flows one way: socket → smtp session → spool → queue → delivery → result.
"""

__version__ = "0.1.0"
