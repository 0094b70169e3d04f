"""The 247Express tracking API as shipmon sees it: one typed answer per lookup."""
