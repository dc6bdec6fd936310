"""The engine side: the model pool (pool), one engine per loaded model (loop: an
asyncio front on a thread that steps), and its scheduler (scheduler, blocks). It never
imports edgelm.server."""
