"""Host adapters: the thin glue between lib_delta and a WebUI (imports the WebUI's `modules`)."""
