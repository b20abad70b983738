"""Importers for upstream release layouts (files as their authors published them → our model folders)."""
