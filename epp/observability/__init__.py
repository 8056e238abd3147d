"""The EPP's own metrics, health service and logging."""
