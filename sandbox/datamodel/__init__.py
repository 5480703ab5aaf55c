"""The sandbox's Redox Data Model surface: ``POST /endpoint`` and ``POST /query``.

``render`` turns canonical records into Redox JSON (events and query responses), ``queries``
answers the supported queries, ``routes`` is the HTTP layer (auth, destinations,
entitlements, faults, write-back). ``sandbox.webhooks`` pushes ``render.render_event``
payloads to registered destinations.
"""
