"""A raw sample checked and rendered through its template (samples, templates, chat_spans), tokenized with its loss
mask (tokenize) into one example (example)."""
