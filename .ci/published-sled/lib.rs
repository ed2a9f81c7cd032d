//! Empty: the package exists only to fetch its dependency (see Cargo.toml).
