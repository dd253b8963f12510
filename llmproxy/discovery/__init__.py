"""Backends found at run time: a `discovery:` entry of `backends:` stands for the addresses a DNS name
resolves to (a Kubernetes headless Service: one per pod) or an endpoints file lists (llm-d's format).

watch.py    one task per entry keeps its set current and says when it changed (the server builds the next fleet)
members.py  the backends an entry's set stands for: the entry's settings, each member's address
resolve.py  a name's addresses: the system resolver, or a configured DNS server asked directly
dnswire.py  the DNS query and answer codec resolve.py uses (sans-IO)
The `discovery:` block and the endpoints file are parsed by llmproxy.config.discovery.
"""
