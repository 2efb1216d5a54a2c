/*
 * envoygeo local Elasticsearch: a single node assembled from the jars that
 * Elasticsearch publishes on Maven Central (server + transport-netty4).
 *
 * Why not the official launcher: the server CLI needs the full distribution
 * (bin/, lib/ on the module path, modules/ with descriptors, a JDK), none of
 * which is on Maven Central. Instead we build the Node the same way the Java
 * test framework's MockNode does - through NodeConstruction with a service
 * provider that supplies a classpath PluginsService - but with no mocks, so
 * the HTTP and transport layers are the real Netty ones.
 *
 * Usage: java -cp <jars>:<this> org.elasticsearch.node.EnvoygeoNode key=value ...
 * Every argument is an Elasticsearch setting (the equivalent of -Ekey=value).
 */
package org.elasticsearch.node;

import envoygeo.elasticsearch.RootInfoPlugin;

import org.elasticsearch.common.logging.LogConfigurator;
import org.elasticsearch.common.settings.Settings;
import org.elasticsearch.env.Environment;
import org.elasticsearch.plugins.ClasspathPluginsService;
import org.elasticsearch.plugins.Plugin;
import org.elasticsearch.plugins.PluginsLoader;
import org.elasticsearch.plugins.PluginsService;
import org.elasticsearch.transport.netty4.Netty4Plugin;

import java.util.LinkedHashMap;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

public final class EnvoygeoNode {

    // Distribution module name -> plugin class. transport-netty4 is the only module of the
    // default distribution published to Maven Central; rest-root is our own stand-in.
    private static final Map<String, Class<? extends Plugin>> PLUGINS = new LinkedHashMap<>();
    static {
        PLUGINS.put("transport-netty4", Netty4Plugin.class);
        PLUGINS.put("rest-root", RootInfoPlugin.class);
    }

    public static void main(String[] args) throws Exception {
        Settings.Builder builder = Settings.builder();
        for (String arg : args) {
            int eq = arg.indexOf('=');
            if (eq <= 0) {
                throw new IllegalArgumentException("expected key=value, got [" + arg + "]");
            }
            builder.put(arg.substring(0, eq), arg.substring(eq + 1));
        }
        Settings settings = builder.build();

        // Same order as the real bootstrap: error listener first so a broken log4j2.properties
        // fails loudly, then the environment (path.home/config, optional elasticsearch.yml),
        // then log4j from config/log4j2.properties (written by the start script).
        LogConfigurator.registerErrorListener();
        Environment env = InternalSettingsPreparer.prepareEnvironment(settings, Map.of(), null, () -> "envoygeo-es");
        LogConfigurator.setNodeName(Node.NODE_NAME_SETTING.get(env.settings()));
        LogConfigurator.configure(env, false);

        NodeServiceProvider services = new NodeServiceProvider() {
            @Override
            PluginsService newPluginService(Environment environment, PluginsLoader ignored) {
                return new ClasspathPluginsService(environment, PLUGINS);
            }
        };
        // forbidPrivateIndexSettings=true: behave like production, reject index.* internals from users.
        Node node = new Node(NodeConstruction.prepareConstruction(env, null, services, true));

        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            // SIGTERM from `elasticsearch.sh stop`: close shards cleanly so the next start needs no recovery.
            try {
                node.prepareForClose();
                node.close();
                node.awaitClose(30, TimeUnit.SECONDS);
            } catch (Exception e) {
                e.printStackTrace();
            } finally {
                stopped.countDown();
            }
        }, "envoygeo-es-shutdown"));

        node.start();
        stopped.await();
    }

    private EnvoygeoNode() {}
}
