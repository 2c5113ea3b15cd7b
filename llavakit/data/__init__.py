"""LLaVA JSON records, chat templates, the render function, images and datasets."""
