"""Small shared helpers: named tasks, sockets in other namespaces, the metrics registry."""
