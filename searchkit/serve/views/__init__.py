"""One module per kind of endpoint; `common` holds what they share (state, auth, filters, URLs)."""
