"""The engine (generation, model manager, settings) and its two faces (ui/, api/)."""
