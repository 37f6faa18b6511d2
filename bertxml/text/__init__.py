"""From note text to token ids: the WordPiece vocabulary (`vocab`) and the paper's out-of-vocabulary
comparison (`oov`), cleaning and chunking notes into `bertxml.chunks` (`tokenize`), and the chunk set,
batching and padding that training reads (`data`). It may import the foundation, `bertxml.platform` and
itself; never models, training, scoring or reports."""
