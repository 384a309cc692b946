"""Built-in filters, one module each, named as the user types them."""
