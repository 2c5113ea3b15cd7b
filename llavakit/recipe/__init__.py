"""The default-model recipe: every stage of llavakit, end to end, resumable (`llavakit recipe`), and the demo."""
