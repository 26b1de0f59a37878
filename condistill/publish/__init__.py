"""Publishing distilled adapters: model cards, hub uploads and exports other tools read."""
