"""The backends: what each is and serves, its health, and how requests are spread over them.

fleet.py     the fleet as one unit that a reload swaps whole (backends, router, routes, balancer, health)
backend.py   one backend: its pool and the live state balancing and health read
router.py    which backends may serve a request (by endpoint and model)
routes.py    `routes:`: the most specific rule a request matches picks its upstreams and strategy
balancer.py  the load-balancing strategies
health.py    active probes and passive ejection; introspect.py and probe.py ask the backends
"""
