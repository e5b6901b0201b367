"""LoRA/QLoRA fine-tuning: the config, data, model, trainer, progress bar and launcher."""
