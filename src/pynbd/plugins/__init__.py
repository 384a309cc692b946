"""Built-in plugins, one module each, named as the user types them."""
