"""HTML reports of retrieval results: :mod:`.html` (metrics tables, query grids with thumbnails), :mod:`.plots`
(Recall@K curves with matplotlib), :mod:`.evaluation` (the page ``diffusers-cir evaluate --html`` writes from an
evaluation's output folder). ``diffusers-cir demo`` writes its page with the same pieces."""
