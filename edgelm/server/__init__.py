"""The HTTP side: the application and its middlewares (app), the LAN guard
(security, connections), request bodies (params), the routes per API (openai, ollama,
manage, service) and what they share (state). It drives the engine side
(edgelm.engine) and never the reverse."""
