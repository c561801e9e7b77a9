package tracking.testonly;

import java.util.List;
import java.util.Map;
import java.util.function.UnaryOperator;
import java.util.regex.Pattern;

import org.apache.lucene.analysis.TokenStream;
import org.apache.lucene.analysis.email.UAX29URLEmailTokenizer;
import org.apache.lucene.analysis.miscellaneous.RemoveDuplicatesTokenFilter;
import org.apache.lucene.analysis.pattern.PatternCaptureGroupTokenFilter;
import org.elasticsearch.index.analysis.TokenFilterFactory;
import org.elasticsearch.index.analysis.TokenizerFactory;
import org.elasticsearch.indices.analysis.AnalysisModule.AnalysisProvider;
import org.elasticsearch.plugins.AnalysisPlugin;
import org.elasticsearch.plugins.Plugin;

/**
 * Test only (tests/realservers.py builds it against a distribution's own lib/ jars).
 *
 * <p>The settings of Elasticsearch's .security index name three analysis components of the
 * analysis-common module, which the integ-test zip leaves out: the filter pattern_capture, the
 * tokenizer uax_url_email and the filter unique ("lowercase" is in the server itself). Without
 * them the index cannot be created, so no API key, native user or role can be stored. This
 * registers them under the same names, on Lucene classes the distribution already ships.
 * "unique" only drops duplicates at one position here: the .security index does not care.
 */
public class SecurityIndexAnalysisPlugin extends Plugin implements AnalysisPlugin {

    @Override
    public Map<String, AnalysisProvider<TokenFilterFactory>> getTokenFilters() {
        AnalysisProvider<TokenFilterFactory> patternCapture = (indexSettings, environment, name, settings) -> {
            List<String> regexes = settings.getAsList("patterns");
            Pattern[] patterns = regexes.stream().map(Pattern::compile).toArray(Pattern[]::new);
            boolean preserveOriginal = settings.getAsBoolean("preserve_original", true);
            return filter(name, input -> new PatternCaptureGroupTokenFilter(input, preserveOriginal, patterns));
        };
        AnalysisProvider<TokenFilterFactory> unique =
            (indexSettings, environment, name, settings) -> filter(name, RemoveDuplicatesTokenFilter::new);
        return Map.of("pattern_capture", patternCapture, "unique", unique);
    }

    @Override
    public Map<String, AnalysisProvider<TokenizerFactory>> getTokenizers() {
        return Map.of("uax_url_email", (indexSettings, environment, name, settings) ->
            TokenizerFactory.newFactory(name, UAX29URLEmailTokenizer::new));
    }

    private static TokenFilterFactory filter(String name, UnaryOperator<TokenStream> create) {
        return new TokenFilterFactory() {
            @Override
            public String name() {
                return name;
            }

            @Override
            public TokenStream create(TokenStream input) {
                return create.apply(input);
            }
        };
    }
}
