"""kiln's conversion rules, one per file; shipped inside the package as kiln.build_rules."""
