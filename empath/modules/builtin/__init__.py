"""Modules that ship with empath: ``recipient_map`` and ``header_checks``."""
