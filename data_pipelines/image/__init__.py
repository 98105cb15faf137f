"""Images decoded and resized to uint8 in the loader's workers (images; normalize runs on the training device), or
cut into dynamic-resolution patches (patches)."""
