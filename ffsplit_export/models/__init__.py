"""Where models come from: built-in tiny models, offline real models, local dirs and hub ids, converters."""
