//! A test CA and certificates made at test time, written as PEM files to a
//! fresh directory.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

pub struct TestPki {
    pub dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl TestPki {
    /// A new CA, `ca.pem` in a fresh directory named after `name`.
    pub fn new(name: &str) -> TestPki {
        let dir = std::env::temp_dir().join(format!(
            "ratatosk-pki-{name}-{}-{:x}",
            std::process::id(),
            rand_core::RngCore::next_u64(&mut rand_core::OsRng)
        ));
        std::fs::create_dir_all(&dir).expect("pki dir");
        let key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Ratatosk test CA {name}"));
        let cert = params.self_signed(&key).expect("ca cert");
        std::fs::write(dir.join("ca.pem"), cert.pem()).expect("write ca");
        TestPki {
            dir,
            issuer: Issuer::new(params, key),
        }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn issue(&self, name: &str, mut params: CertificateParams) {
        let key = KeyPair::generate().expect("key");
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        std::fs::write(self.dir.join(format!("{name}.pem")), cert.pem()).expect("write cert");
        std::fs::write(self.dir.join(format!("{name}.key")), key.serialize_pem())
            .expect("write key");
    }

    /// `{name}.pem` and `{name}.key`: a server certificate for `sans`
    /// (names or IP addresses).
    pub fn server(&self, name: &str, sans: &[&str]) {
        self.issue(name, server_params(sans));
    }

    /// As [`Self::server`], but it expired in 2000.
    pub fn expired_server(&self, name: &str, sans: &[&str]) {
        let mut params = server_params(sans);
        params.not_before = rcgen::date_time_ymd(1999, 1, 1);
        params.not_after = rcgen::date_time_ymd(2000, 1, 1);
        self.issue(name, params);
    }

    /// `{name}.pem` and `{name}.key`: a client certificate.
    pub fn client(&self, name: &str) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(name, params);
    }
}

fn server_params(sans: &[&str]) -> CertificateParams {
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("params");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
