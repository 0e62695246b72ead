"""Media I/O: the ffmpeg binary, stream facts and decoding, portraits, assembly, verification."""
