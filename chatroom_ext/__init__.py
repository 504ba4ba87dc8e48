"""Optional capabilities of the chatroom server that need third-party packages.

server.py imports a module from here only when its flag is given
(`-redis` -> cluster, `-uvloop` -> fastloop); without those flags nothing
here, and nothing outside the standard library, is imported.
"""
