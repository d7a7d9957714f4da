"""Delivery: from a queued message to a result per recipient.

route.py decides where a domain's mail goes (routes, relayhost, MX via dns.py);
client.py speaks SMTP/LMTP to the next hop; maildir.py writes local Maildirs;
dsn.py builds RFC 3464 bounces. The queue (empath.queue) decides *when*.
"""
