"""The account server: accounts, API keys and the credit ledger."""
