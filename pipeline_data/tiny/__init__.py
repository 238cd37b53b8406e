"""The bundled tiny face world: aligned crops, tokenizer, and the small SD-architecture base model."""
