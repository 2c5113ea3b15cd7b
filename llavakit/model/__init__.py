"""The LLaVA model: vision tower + projector + causal LM, in the Hugging Face `llava` layout."""
