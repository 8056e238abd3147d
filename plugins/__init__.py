"""Built-in plugins. Each module registers one plugin type with `epp.scheduling.registry.register`.

The framework never imports a plugin by name: `epp.scheduling.registry.load_builtin_plugins()` imports
every module of this package, and the decorators fill the registry.
"""
