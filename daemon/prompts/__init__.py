"""Prompts and their results: the queue, the runner that asks the model, the prompt's states, long recordings cut
into chunks and stitched back, and the result files (Markdown, subtitles) with speakers kept across chunks."""
