//! The CRI front end and the `corrald` daemon (issue 5).
