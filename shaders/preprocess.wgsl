// Camera frame preprocessing: colour conversion, rotation, resize, crop, normalisation (filled in by the streaming work).
