"""What runs inside a worker process: its entry point, parent-death handling, the generic stage loop."""
