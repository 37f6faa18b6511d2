"""From note text to token ids: the WordPiece vocabulary (`vocab`), cleaning and chunking notes into
`bertxml.chunks` (`tokenize`), and the chunk set, batching and padding that training reads (`data`). It may
import `bertxml.config`, `bertxml.platform` and itself; never models, training, scoring or reports."""
