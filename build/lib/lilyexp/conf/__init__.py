"""lilyexp's config tree (the registry): one yaml per backbone, task, method; experiment files per paper table.
Shipped inside the package as ``lilyexp.conf`` so an installed lilyexp finds it from any directory."""
