"""Adapters that let other tools drive tilevlm models (imported only by those tools)."""
