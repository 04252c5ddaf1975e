"""HTTP server: routes, schemas, batching engine, metrics."""
