"""One router per API family: OpenAI, Cohere (v1, v2; Jina's shape is Cohere v1's), TEI, and the
routes every server has. Each server mounts only its own task's routers."""
