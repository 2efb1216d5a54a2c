package envoygeo;

import java.io.FileInputStream;
import java.io.InputStream;
import java.security.KeyStore;
import java.security.cert.Certificate;
import java.security.cert.CertificateFactory;
import java.util.HashMap;
import java.util.Map;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;
import org.komamitsu.fluency.Fluency;
import org.komamitsu.fluency.fluentd.FluencyBuilderForFluentd;

/**
 * A forward-protocol client for envoygeo's tests: Java fluency (PackedForward chunks), an
 * implementation independent of envoygeo's. Emits -events records ({"log": "<prefix>-<i>",
 * "n": i}) and exits 0 once every buffered chunk was flushed (with -ack: acknowledged by
 * the server), 1 otherwise.
 *
 * <p>Flags: -host, -port, -events, -prefix, -tag, -ack (ack response mode), -ca FILE (TLS,
 * the server's certificate verified against this PEM CA).
 */
public final class FluentClient {
  public static void main(String[] args) throws Exception {
    String host = "127.0.0.1";
    int port = 24224;
    int events = 100;
    String prefix = "java";
    String tag = "envoy.access";
    boolean ack = false;
    String ca = null;
    for (int i = 0; i < args.length; i++) {
      switch (args[i]) {
        case "-host" -> host = args[++i];
        case "-port" -> port = Integer.parseInt(args[++i]);
        case "-events" -> events = Integer.parseInt(args[++i]);
        case "-prefix" -> prefix = args[++i];
        case "-tag" -> tag = args[++i];
        case "-ack" -> ack = true;
        case "-ca" -> ca = args[++i];
        default -> {
          System.err.println("unknown flag " + args[i]);
          System.exit(2);
        }
      }
    }
    FluencyBuilderForFluentd builder = new FluencyBuilderForFluentd();
    builder.setAckResponseMode(ack);
    builder.setFlushAttemptIntervalMillis(100);
    builder.setSenderMaxRetryCount(20);
    if (ca != null) {
      builder.setSslEnabled(true);
      builder.setSslSocketFactory(trusting(ca).getSocketFactory());
    }
    Fluency fluency = builder.build(host, port);
    for (int i = 0; i < events; i++) {
      Map<String, Object> rec = new HashMap<>();
      rec.put("log", prefix + "-" + i);
      rec.put("n", i);
      fluency.emit(tag, rec);
    }
    fluency.flush();
    boolean flushed = fluency.waitUntilAllBufferFlushed(60);
    fluency.close();
    boolean terminated = fluency.waitUntilFlusherTerminated(60);
    if (!flushed || !terminated) {
      System.err.println("not flushed: " + fluency.getBufferedDataSize() + " bytes left");
      System.exit(1);
    }
    System.out.println("posted " + events);
  }

  private static SSLContext trusting(String caFile) throws Exception {
    KeyStore ks = KeyStore.getInstance(KeyStore.getDefaultType());
    ks.load(null, null);
    try (InputStream in = new FileInputStream(caFile)) {
      int n = 0;
      for (Certificate c : CertificateFactory.getInstance("X.509").generateCertificates(in)) {
        ks.setCertificateEntry("ca" + n++, c);
      }
    }
    TrustManagerFactory tmf =
        TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
    tmf.init(ks);
    SSLContext ctx = SSLContext.getInstance("TLS");
    ctx.init(null, tmf.getTrustManagers(), null);
    return ctx;
  }
}
