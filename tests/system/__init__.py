"""System tests: empath under a real systemd in a booted Debian 12 container."""
