"""Reading and writing: edit requests in every format, local/S3 storage, and the re-ranking registry."""
