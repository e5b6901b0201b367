"""Records: reading raw sources, de-duplication, token counts, sampling (the ground floor)."""
