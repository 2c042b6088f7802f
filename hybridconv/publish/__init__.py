"""Publishing: the model card, uploads to the Hub, and release plans.

Nothing is published that was not verified: an upload needs a passing
``verification.json`` whose weights hash matches the folder's current weight
files (``--allow-unverified`` overrides, loudly, and the card says so).
The Hub token comes from ``HF_TOKEN`` or the huggingface_hub login and is never
printed, logged, or written into a report or card.
"""
