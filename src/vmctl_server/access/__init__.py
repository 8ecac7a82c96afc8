"""Who is calling and what they may do: identities, the policy, limits, admission, the audit log.
Imports no transport."""
