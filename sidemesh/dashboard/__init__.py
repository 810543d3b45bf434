"""``sidemesh dashboard``: a live web page of the mesh that keeps working while the control plane is dead.

Like ``sidemesh status`` it asks every sidecar's admin API directly (``/state`` and
``/metrics``) and the control plane's ``/status`` only when it answers. The pure parts
(``rates``, ``graph``, ``view``, ``timeline``) turn the answers into the
page's data; ``scrape`` does the asking and ``server`` serves the page and pushes every
round to the browsers as server-sent events.
"""
