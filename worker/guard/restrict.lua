-- restrict_account(seconds, reason): the provider said the account is restricted. Only ever extends.
-- ARGV: 2 duration ms, 3 reason (no personal data) (ARGV[1] and KEYS: see lib.lua)
restrict(KEYS[1], (read_args(ARGV[1])), tonumber(ARGV[2]), ARGV[3])
return 0
