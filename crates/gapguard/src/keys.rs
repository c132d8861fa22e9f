//! `gapguard keys new`: a fresh API key. The secret is printed once, with the `[[api_key]]`
//! block for the server's config file, which holds only the secret's SHA-256: the server
//! hashes the secret a request presents and compares the hashes in constant time.

use std::io::Write as _;

use base64::Engine as _;
use clap::{Args, Subcommand, ValueEnum};
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

use crate::failure::Failure;

/// Random bytes in a secret (printed as 43 characters of unpadded base64url).
pub const SECRET_BYTES: usize = 32;
/// What every secret starts with: secret scanners and people can tell one at a glance, and
/// it never starts with `-` (which a command line would take for a flag).
pub const SECRET_PREFIX: &str = "gg_";

/// `gapguard keys`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print a new random secret (shown only now) and the `[[api_key]]` block to paste into the
    /// server's config file.
    New(NewArgs),
}

/// `gapguard keys new`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// A name for the key; the audit log records it with every request the key makes.
    #[arg(long, value_name = "ID")]
    pub id: String,
    /// Namespaces the key may use, comma-separated; `*` for all.
    #[arg(long, value_name = "NS,...", value_delimiter = ',', required = true)]
    pub namespaces: Vec<String>,
    /// What the key may do: `read` (reads, checks, watch, audit), `write` (and acts, txns,
    /// puts, deletes, reservations, leases), `admin` (and grants, pool capacities, orphan
    /// resolution, audit verification).
    #[arg(long, value_enum)]
    pub role: Role,
}

/// A key's role, as the config file spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Reads, checks, watch, audit.
    Read,
    /// Plus acts, txns, puts, deletes, reservations, leases.
    Write,
    /// Plus grants, pool capacities, orphan resolution, audit verification.
    Admin,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }
}

/// Prints the secret and the config block.
pub fn new(args: &NewArgs) -> anyhow::Result<()> {
    check(args)?;
    let secret = new_secret();
    let block = config_block(args, &sha256_hex(&secret));
    let mut out = std::io::stdout().lock();
    writeln!(out, "# The secret of API key {:?}, shown only now: give it to the client", args.id)?;
    writeln!(out, "# (env GAPGUARD_API_KEY, or Client::builder(url).api_key(..)). The server keeps only its hash.")?;
    writeln!(out, "{secret}")?;
    writeln!(out)?;
    writeln!(out, "# Paste into the server's config file, then restart the server:")?;
    write!(out, "{block}")?;
    out.flush()?;
    Ok(())
}

/// Refuses what the server's config would refuse, or what would not survive being written
/// into it.
fn check(args: &NewArgs) -> Result<(), Failure> {
    if args.id.trim().is_empty() || args.id.chars().any(char::is_control) {
        return Err(Failure::usage("--id must not be empty or hold control characters"));
    }
    for ns in &args.namespaces {
        let name_ok = !ns.is_empty() && ns.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ns != "*" && !name_ok {
            return Err(Failure::usage(format!(
                "--namespaces: {ns:?} is not a namespace (1 or more of A-Z a-z 0-9 . _ -) or `*`"
            )));
        }
    }
    Ok(())
}

/// `SECRET_BYTES` from the operating system's random source, as unpadded base64url after
/// [`SECRET_PREFIX`] (not hex, so that a secret pasted where its hash belongs is refused by
/// the config parser).
fn new_secret() -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{SECRET_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Lowercase hex SHA-256 of the secret's bytes, as the config's `secret_sha256`.
pub fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The `[[api_key]]` block. Strings are written as JSON string literals, which are TOML
/// basic strings once control characters are excluded (`check` does).
fn config_block(args: &NewArgs, secret_sha256: &str) -> String {
    let quote = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let namespaces: Vec<String> = args.namespaces.iter().map(|ns| quote(ns)).collect();
    format!(
        "[[api_key]]\nid = {}\nsecret_sha256 = \"{secret_sha256}\"\nnamespaces = [{}]\nrole = \"{}\"\n",
        quote(&args.id),
        namespaces.join(", "),
        args.role.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(id: &str, namespaces: &[&str], role: Role) -> NewArgs {
        NewArgs { id: id.into(), namespaces: namespaces.iter().map(|s| (*s).to_owned()).collect(), role }
    }

    #[test]
    fn the_block_is_what_the_server_config_parses() {
        let args = args("checkout \"svc\"", &["shop", "*"], Role::Write);
        let hash = sha256_hex("s3cret");
        let config = gapguard_server::Config::parse(&config_block(&args, &hash)).unwrap();
        let key = &config.api_keys[0];
        assert_eq!(key.id, "checkout \"svc\"");
        assert_eq!(key.namespaces, ["shop", "*"]);
        assert_eq!(key.role, gapguard_server::Role::Write);
        assert_eq!(key.secret_sha256, hash);
    }

    #[test]
    fn the_hash_is_lowercase_hex_sha256_of_the_secret_string() {
        // sha256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn secrets_are_fresh_and_not_mistakable_for_a_hash() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert_eq!(a.len(), SECRET_PREFIX.len() + 43, "{a}");
        assert!(a.starts_with(SECRET_PREFIX));
        let pasted_by_mistake =
            format!("[[api_key]]\nid = \"x\"\nsecret_sha256 = \"{a}\"\nnamespaces = [\"a\"]\nrole = \"read\"\n");
        assert!(gapguard_server::Config::parse(&pasted_by_mistake).is_err());
    }

    #[test]
    fn bad_ids_and_namespaces_are_usage_errors() {
        assert!(check(&args("", &["a"], Role::Read)).is_err());
        assert!(check(&args("a\nb", &["a"], Role::Read)).is_err());
        assert!(check(&args("svc", &["shop/x"], Role::Read)).is_err());
        assert!(check(&args("svc", &[""], Role::Read)).is_err());
        assert!(check(&args("svc", &["shop", "*", "a.b-c_d"], Role::Admin)).is_ok());
    }
}
