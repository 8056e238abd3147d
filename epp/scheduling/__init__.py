"""The scheduling framework: extension points, registry, scheduler. It knows no concrete plugin."""
